"""Export and replay carry the inspector's arrays (issue 36, part 4): an answer's attention over the images and the
images' effect on each token go into a compressed .npz beside the exported JSON, and replay computes them again and
says how far they are, failing when they are beyond tolerance."""
import json
from pathlib import Path

import numpy as np
import pytest

from llava_ui.engine import Engine
from llava_ui.commands.main import main
from llava_ui.web.handlers import ChatHandlers

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CHART_A, CHART_B = str(ASSETS / "chart_sales_2023.png"), str(ASSETS / "chart_sales_2024.png")
VIDEO = str(ASSETS / "traffic_light.webm")
STEPS = 6


@pytest.fixture(scope="module")
def chat(tiny_dir):
    return ChatHandlers(Engine(str(tiny_dir), dtype="float32").load(), frames=2, max_files=3, max_upload_mb=5)


def ask(chat, session, text, files, **looking):
    _, _, session = chat.send({"text": text, "files": files}, session, 2)
    updates = list(chat.respond(session, "", 0, 1.0, 0, 1.0, STEPS, 3, "", False, looking.get("attention", False),
                                looking.get("image_effect", False)))
    return session, updates[-1]


def exported(chat, session, tiny_dir) -> list[Path]:
    paths = chat.export(session)["value"]
    paths = [Path(p) for p in ([paths] if isinstance(paths, str) else paths)]
    export = json.loads(paths[0].read_text())
    export["model"] = str(tiny_dir)  # the engine was built from this folder
    paths[0].write_text(json.dumps(export))
    return paths


def test_export_keeps_the_arrays_beside_the_json_and_replay_reproduces_them(chat, tiny_dir, capsys):
    session, views = ask(chat, None, "first <image> second <image>", [CHART_A, CHART_B], attention=True,
                         image_effect=True)
    assert views[11]["visible"] and len(views[11]["value"]) == 2  # a heat map per image
    session, _ = ask(chat, session, "and the video?", [VIDEO], image_effect=True)
    record = session.turns[0].record
    json_path, arrays_path = exported(chat, session, tiny_dir)
    assert arrays_path == json_path.with_suffix(".npz")
    export = json.loads(json_path.read_text())
    assert export["arrays"] == arrays_path.name
    first, second = (entry["output"]["arrays"] for entry in export["turns"])
    assert "attention" not in second and second["image_effect"]  # the second answer asked for the effect only
    with np.load(arrays_path) as stored:
        attention = [stored[name] for name in first["attention"]]
        layers = len(record.attention[0])
        assert [a.shape for a in attention] == [(len(record.token_ids), layers, n)
                                               for n in record.visual_tokens_per_image]
        np.testing.assert_allclose(attention[1][2, 1], record.attention[2][1][1], rtol=1e-6)
        np.testing.assert_allclose(stored[first["image_effect"]], record.image_effect, rtol=1e-6)
    assert all(isinstance(name, str) for name in first["attention"])  # names in the JSON, the weights beside it
    capsys.readouterr()
    assert main(["replay", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("within the tolerance") == 3 and "beyond" not in out
    assert f"attention: {len(record.token_ids)} tokens x {layers} layers x 2 images compared" in out


def test_replay_reports_arrays_that_came_out_different(chat, tiny_dir, capsys):
    session, _ = ask(chat, None, "what is it? <image>", [CHART_A], attention=True)
    json_path, arrays_path = exported(chat, session, tiny_dir)
    with np.load(arrays_path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    key = next(iter(arrays))
    arrays[key][0, 0, 0] += 0.1
    np.savez_compressed(arrays_path, **arrays)
    capsys.readouterr()
    assert main(["replay", str(json_path)]) == 1  # the same answer, but not the same attention
    out = capsys.readouterr().out
    assert "same answer" in out and "beyond the tolerance" in out


def test_an_export_without_inspector_arrays_is_one_json_file(chat, tiny_dir):
    session, _ = ask(chat, None, "what is it? <image>", [CHART_A])
    paths = exported(chat, session, tiny_dir)
    assert len(paths) == 1 and "arrays" not in json.loads(paths[0].read_text())

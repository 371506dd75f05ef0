"""paddlenlp imported without its package-level imports (llava_ui/model/paddlenlp_lean.py), in fresh interpreters:
what is skipped, that the rest of the library still comes on demand, and the message when a dependency is missing."""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("sklearn", "pandas", "pyarrow", "datasets", "paddlenlp.trainer", "paddlenlp.taskflow")


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_model_tokenizer_and_downloader_import_without_the_rest_of_paddlenlp():
    out = run(f"""
        import sys
        import llava_ui.checkpoints.load, llava_ui.model.llava, llava_ui.chat.prompt
        from paddlenlp.transformers import Qwen2ForCausalLM
        from paddlenlp.transformers.qwen2.tokenizer import Qwen2Tokenizer
        from paddlenlp.transformers.model_utils import no_init_weights
        from paddlenlp.utils.download import resolve_file_path
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        import paddlenlp, importlib.metadata
        assert paddlenlp.__version__ == importlib.metadata.version("paddlenlp")
        try:
            paddlenlp.Taskflow  # the real __init__, on demand (its own dependencies may not be installed)
            print("Taskflow", "paddlenlp.trainer" in sys.modules)
        except ImportError as err:
            print("ImportError", err.name)
    """).splitlines()
    assert out[0] == "[]"
    full_dependencies = importlib.util.find_spec("datasets") is not None
    assert out[1] == ("Taskflow True" if full_dependencies else "ImportError datasets")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                    reason="paddlenlp is installed without its own dependencies (constraints.txt): no full import")
def test_already_imported_paddlenlp_is_left_alone():
    out = run("""
        import sys, paddlenlp
        import llava_ui.model.llava
        print(sys.modules["paddlenlp"] is paddlenlp, "paddlenlp.trainer" in sys.modules)
    """)
    assert out.split() == ["True", "True"]


def test_a_missing_dependency_names_the_package_and_the_install_command():
    out = run("""
        import importlib, sys
        real = importlib.import_module
        def broken(name, *args):
            if name == "paddlenlp.data":
                raise ModuleNotFoundError("No module named 'colorlog'", name="colorlog")
            return real(name, *args)
        importlib.import_module = broken
        from llava_ui.model.paddlenlp_lean import lean_paddlenlp
        try:
            lean_paddlenlp()
        except ImportError as err:
            print(err)
        print("paddlenlp" in sys.modules)  # nothing half-imported is left behind
    """).splitlines()
    assert "'colorlog', which is not installed" in out[0] and "constraints.txt" in out[0]
    assert out[1] == "False"

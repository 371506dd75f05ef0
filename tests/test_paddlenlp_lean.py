"""paddlenlp imported without its package-level imports (llava_ui/model/paddlenlp_lean.py), in fresh interpreters:
what is skipped, that the rest of the library still comes on demand, and the fallback to a whole import."""
import subprocess
import sys
import textwrap
from pathlib import Path

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
        from paddlenlp.transformers import AutoTokenizer, Qwen2ForCausalLM
        from paddlenlp.transformers.model_utils import no_init_weights
        from paddlenlp.utils.download import resolve_file_path
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        import paddlenlp, importlib.metadata
        assert paddlenlp.__version__ == importlib.metadata.version("paddlenlp")
        print(callable(paddlenlp.Taskflow), "paddlenlp.trainer" in sys.modules)  # the real __init__, on demand
        try:
            paddlenlp.no_such_name
        except AttributeError as err:
            print("AttributeError", err)
    """).splitlines()
    assert out[0] == "[]"
    assert out[1] == "True True"
    assert out[2] == "AttributeError module 'paddlenlp' has no attribute 'no_such_name'"


def test_already_imported_paddlenlp_is_left_alone():
    out = run("""
        import sys, paddlenlp
        import llava_ui.model.llava
        print(sys.modules["paddlenlp"] is paddlenlp, "paddlenlp.trainer" in sys.modules)
    """)
    assert out.split() == ["True", "True"]


def test_a_failing_lean_import_falls_back_to_the_whole_package():
    out = run("""
        import importlib, sys
        real = importlib.import_module
        def broken(name, *args):
            if name == "paddlenlp.data":
                raise ImportError("as if another paddlenlp release")
            return real(name, *args)
        importlib.import_module = broken
        from llava_ui.model.paddlenlp_lean import lean_paddlenlp
        lean_paddlenlp()
        print("paddlenlp" in sys.modules)
        importlib.import_module = real
        from paddlenlp.transformers import Qwen2ForCausalLM  # nothing half-imported left: the whole package
        print("paddlenlp.trainer" in sys.modules)
    """)
    assert out.split() == ["False", "True"]

"""Import paddlenlp's Qwen2 model, tokenizer and downloader without its package-level imports.

`import paddlenlp` runs paddlenlp/__init__.py, which imports every subpackage (datasets, metrics, trainer,
taskflow, server) and with them scipy, pandas, scikit-learn, pyarrow and Hugging Face `datasets`: several times
the memory and import time of the parts this project uses (bench/README.md has the figures).
`lean_paddlenlp()` registers the package without running that file; its submodules import as usual, and the first
access to anything else on the package (`paddlenlp.Taskflow`, ...) runs the real __init__ then, so other code in
the same process still sees the whole library (when paddlenlp's own dependencies are installed: this project
installs paddlenlp without them, see constraints.txt). This project's modules get paddlenlp's through
`paddlenlp_module(name)`, which does this first; once paddlenlp is imported the lean step does nothing.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from types import ModuleType


def paddlenlp_module(name: str) -> ModuleType:
    """`paddlenlp.<...>` module `name`, paddlenlp registered the lean way if it is not imported yet."""
    lean_paddlenlp()
    return importlib.import_module(name)


def lean_paddlenlp() -> None:
    if "paddlenlp" in sys.modules:
        return
    spec = importlib.util.find_spec("paddlenlp")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed (the import that follows says so) or not a regular package: import it normally
    package = importlib.util.module_from_spec(spec)  # __path__, __file__, __spec__ set; __init__.py not run
    package.__version__ = importlib.metadata.version("paddlenlp")
    completed = False

    def complete(name: str):
        """Module __getattr__: only called for names not set yet, i.e. the ones the real __init__ would add."""
        nonlocal completed
        if completed or name.startswith("__"):
            raise AttributeError(f"module 'paddlenlp' has no attribute {name!r}")
        completed = True
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = complete
    sys.modules["paddlenlp"] = package
    _huggingface_hub_2_compatible()
    try:
        # the order paddlenlp/__init__.py imports them in: paddlenlp.data's collators import the transformers
        # package, which must not be the first of the two (a circular import fails the other way round)
        importlib.import_module("paddlenlp.data")
        importlib.import_module("paddlenlp.transformers")
    except Exception as err:
        for name in [name for name in sys.modules if name == "paddlenlp" or name.startswith("paddlenlp.")]:
            del sys.modules[name]
        missing = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
        needs = f"the Python package {missing!r}, which is not installed" if missing else f"{type(err).__name__}: {err}"
        raise ImportError(f"paddlenlp's Qwen2 model could not be imported: {needs}. Install the local engine with "
                          "pip install -c constraints.txt '.[server]' && pip install --no-deps -c constraints.txt "
                          "paddlenlp (README, Quick start)") from err
    import paddle  # after paddlenlp's modules, as its own __init__ does

    paddle.disable_signal_handler()  # what the real __init__ ends with (Python's own handlers stay in charge)


def _huggingface_hub_2_compatible() -> None:
    """paddlenlp imports `repo_type_and_id_from_hf_id`, which huggingface_hub 2 removed, for its push-to-Hub
    helpers alone (this project never uploads). Gradio's installer may bring huggingface_hub 2 (a Space installs
    Gradio after requirements.txt), so the name is provided, failing clearly if it is ever called."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "repo_type_and_id_from_hf_id"):
        def repo_type_and_id_from_hf_id(hf_id: str, hub_url: str | None = None):
            raise NotImplementedError("uploading with paddlenlp needs huggingface_hub < 2")

        huggingface_hub.repo_type_and_id_from_hf_id = repo_type_and_id_from_hf_id

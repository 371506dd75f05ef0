"""Chat with, demo and inspect LLaVA-NeXT-Interleave (Qwen1.5-0.5B + SigLIP) on PaddlePaddle."""
import logging
import warnings

__version__ = "0.1.0"
DEFAULT_MODEL = "lmms-lab/llava-next-interleave-qwen-0.5b"


def _quiet_dependencies() -> None:
    """Paddle and paddlenlp print build and deprecation chatter on import; users see only our messages."""
    warnings.filterwarnings("ignore", message="No ccache found")
    warnings.filterwarnings("ignore", message=".*distutils.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="(?s).*is deprecated since")
    # paddlenlp resets its logger's level on import, but a filter on the logger object stays
    for name in ("PaddleNLP", "datasets"):
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.WARNING)


_quiet_dependencies()

"""One definition of every flag: the app and the commands read the same LLAVA_* variables, booleans are spelled
as people spell them, every flag has help with its default, --version and --log-level exist, and importing the
package changes no warning filter."""
import argparse
import subprocess
import sys
import warnings

import pytest

from llava_ui.commands import main as cli
from llava_ui.commands import serve


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("LLAVA_") and name not in ("LLAVA_UI_HOME", "LLAVA_UI_THREADS"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("SPACE_ID", raising=False)
    return monkeypatch


def generate_args(argv):
    return cli.build_parser().parse_args(["generate", "--prompt", "hi", *argv])


def test_the_commands_read_the_same_variables_as_the_app(clean_env):
    clean_env.setenv("LLAVA_MODEL", "tiny-random")
    clean_env.setenv("LLAVA_DTYPE", "float32")
    clean_env.setenv("LLAVA_CONTEXT_LENGTH", "2048")
    clean_env.setenv("LLAVA_HUB", "hf")
    for args in (generate_args([]), serve.parse_args([])):
        assert (args.model, args.dtype, args.context_length, args.hub) == ("tiny-random", "float32", 2048, "hf")
    assert generate_args(["--model", "other"]).model == "other"  # the flag wins over the variable


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                         ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_boolean_variables_take_the_usual_spellings(clean_env, text, value):
    clean_env.setenv("LLAVA_EAGER", text)
    clean_env.setenv("LLAVA_SHARE", text)
    args = serve.parse_args([])
    assert args.eager is value and args.share is value


def test_a_bad_variable_is_a_one_line_error(clean_env):
    clean_env.setenv("LLAVA_EAGER", "maybe")
    with pytest.raises(SystemExit, match="LLAVA_EAGER='maybe' is not a boolean"):
        serve.parse_args([])
    clean_env.setenv("LLAVA_EAGER", "1")
    clean_env.setenv("LLAVA_PORT", "eighty")
    with pytest.raises(SystemExit, match="LLAVA_PORT='eighty'"):
        serve.parse_args([])


def test_eager_loading_can_be_turned_off_on_a_space(clean_env):
    clean_env.setenv("SPACE_ID", "someone/space")
    assert serve.parse_args([]).eager is True and serve.parse_args(["--no-eager"]).eager is False
    clean_env.setenv("LLAVA_EAGER", "0")
    assert serve.parse_args([]).eager is False


def _parsers():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    captured = {}
    original = argparse.ArgumentParser.parse_args
    try:  # serve parses its own flags: capture its parser
        argparse.ArgumentParser.parse_args = lambda self, argv=None: captured.setdefault("serve", self)
        serve.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return {"llava-ui": parser, **{name: p for name, p in subparsers.choices.items() if p._actions[1:]},
            "serve": captured["serve"]}


def test_every_flag_has_help_and_shows_its_default(clean_env):
    for name, parser in _parsers().items():
        text = "".join(parser.format_help().split())  # argparse wraps lines, even inside words
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "version":
                shown = "".join(f"default: {action.default}".split())
                assert shown in text or "default:on" in text, (name, action.dest)
    assert "[LLAVA_MODEL]" in _parsers()["generate"].format_help()


def test_version_and_log_level(clean_env):
    done = subprocess.run([sys.executable, "-m", "llava_ui", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("llava-ui ") and "paddlepaddle" in done.stdout
    clean_env.setenv("LLAVA_LOG_LEVEL", "DEBUG")
    assert generate_args([]).log_level == "debug" and serve.parse_args([]).log_level == "debug"


def test_one_logging_setup_shows_the_projects_info_lines(clean_env):
    code = ("from llava_ui.commands.common import configure_logging; import logging; configure_logging('info'); "
            "logging.getLogger('llava_ui.openai.server').info('client left'); "
            "logging.getLogger('somelib').info('noise')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "INFO llava_ui.openai.server: client left" in done.stderr and "noise" not in done.stderr


def test_importing_the_package_changes_no_warning_filter():
    code = ("import warnings, paddle, gradio, cv2\n"  # libraries may set their own filters: ours are what is tested
            "from llava_ui.model.paddlenlp_lean import lean_paddlenlp\n"
            "lean_paddlenlp(); before = list(warnings.filters)\n"
            "import llava_ui, llava_ui.commands.main, llava_ui.web.page, llava_ui.checkpoints.load\n"
            "print(warnings.filters == before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
    assert warnings  # the module is used above in the child

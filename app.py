"""Start the web chat and the OpenAI-compatible API: `python app.py --help` (the same as `python -m llava_ui serve`).

Every flag also reads an environment variable (LLAVA_<FLAG>, e.g. LLAVA_MODEL, LLAVA_PORT) so a Hugging Face
Space can be configured from its settings page. On a Space the server binds 0.0.0.0 by itself.
"""
from llava_ui.commands.serve import UploadsOnly, create_app, main, parse_args  # noqa: F401 - the app's entry points

if __name__ == "__main__":
    main()

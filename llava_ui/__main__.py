import sys

from llava_ui.commands.main import main

sys.exit(main())

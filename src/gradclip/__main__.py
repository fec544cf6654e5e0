"""``python -m gradclip``: the same command line as the ``gradclip`` script."""

from gradclip.cli import main

raise SystemExit(main())

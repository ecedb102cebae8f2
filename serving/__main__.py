"""``python -m serving [flags]``: ``streamrec serve`` without the ``streamrec`` entry point."""
import sys

from serving.cli import main

sys.exit(main())

"""`python -m pykubeproxy`, the same as the `pykubeproxy` command."""

from pykubeproxy.cli import main

raise SystemExit(main())

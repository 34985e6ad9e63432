"""``python -m server``: run the songrec gRPC server (see ``python -m server --help``)."""

from server.app import main

raise SystemExit(main())

"""``python -m mechlib.hub push outputs/<run> <owner>/<repo>`` (see :func:`mechlib.hub.main`)."""

from mechlib.hub import main

raise SystemExit(main())

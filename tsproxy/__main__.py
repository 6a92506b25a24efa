from tsproxy.cli import main

raise SystemExit(main())

from edgepeft.cli import main

raise SystemExit(main())

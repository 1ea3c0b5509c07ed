from pcipass.cli import main

raise SystemExit(main())

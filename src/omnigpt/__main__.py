from omnigpt.cli import main

raise SystemExit(main())

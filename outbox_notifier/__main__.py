from outbox_notifier.cli import main

raise SystemExit(main())

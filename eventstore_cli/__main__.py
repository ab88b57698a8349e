from eventstore_cli import main

main()

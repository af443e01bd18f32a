from fleetkeeper.cli.main import main

main()

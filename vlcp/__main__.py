from vlcp.cli.main import main

main()

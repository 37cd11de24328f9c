from vlcp.cli import main

main()

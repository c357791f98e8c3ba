from voxflow.cli import main

main()

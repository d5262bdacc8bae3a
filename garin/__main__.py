from garin.cli import main

main()

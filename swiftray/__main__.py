from swiftray.cli import main

main()

from cnalens.cli import entry

entry()

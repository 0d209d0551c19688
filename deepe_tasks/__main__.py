"""`python -m deepe_tasks` is the `deepe` command."""

from deepe_tasks.ui.cli import main

if __name__ == "__main__":
    main()

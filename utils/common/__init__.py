"""Shared leaves: errors, the CLI frame, flag checks, paths, user files, threads, torch helpers, box maths, drawing.
They import nothing else of the project's."""

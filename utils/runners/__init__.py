"""What each top-level script does, callable from tests: one module per script, ``run_<script>(options)``."""

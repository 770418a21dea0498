"""The watched folder, its journal, and the headless queue."""

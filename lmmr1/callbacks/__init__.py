"""Lightning callbacks: sample tables, weight sync, curriculum, plots."""

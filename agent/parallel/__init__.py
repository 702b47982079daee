"""Parallel: capture workers with their central stage (live interfaces), and pools that meter many
capture files at once. Imports the layers before output, and output itself."""

"""Getting finished datasets out: export formats and their destinations, contact sheets and galleries."""

"""Research analyses over finished runs: multi-seed study statistics, anatomy vs error."""

// Filled in by the checkpointing work (issue 5).

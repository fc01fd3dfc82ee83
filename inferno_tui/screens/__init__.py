"""One screen per concern; each lays out widgets and hands them snapshots."""

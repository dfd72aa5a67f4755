"""``urial-edge eval``: question sets, configs, judge-free metrics, a judge model, reports."""

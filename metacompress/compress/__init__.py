"""Compression mechanisms, no learning: what is coupled (groups), which channels go
(importance), how much goes where (allocations), exact budgets, repair by distillation."""

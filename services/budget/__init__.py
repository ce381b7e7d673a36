"""budget: token budgets per user, reserved at admission and billed per step."""

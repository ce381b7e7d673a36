"""approvals: durable human approvals, one record per request, decided once, with deadlines and escalation."""

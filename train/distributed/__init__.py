"""Distributed: process groups, agreement across ranks, the hang watchdog, preemption, fault injection."""

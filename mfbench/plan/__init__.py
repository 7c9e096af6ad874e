"""The step program of a workload: compiled (plan.compile) and shown (plan.show)."""
from mfbench.plan.compile import chunk_rows, compile_program, compile_workload
from mfbench.plan.show import format_plan

__all__ = ["chunk_rows", "compile_program", "compile_workload", "format_plan"]

"""Stand-in child workflows for the fast ``AccountWorkflow`` tests (tests/test_account_workflow_branches.py).

In its own module, free of side effects at import, because the workflow sandbox re-imports it."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.contract import INVOICE_WORKFLOW, InvoiceWorkflowInput


@workflow.defn(name=INVOICE_WORKFLOW)
class EchoInvoiceWorkflow:
    """Registered under the invoice workflow's name: returns the input the account workflow built for it."""

    @workflow.run
    async def run(self, input: InvoiceWorkflowInput) -> InvoiceWorkflowInput:
        return input

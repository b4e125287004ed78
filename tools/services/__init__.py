"""Sample business systems over HTTP, a CRM and an ERP, that the sample workflows call through
the tool gateway. Run one with ``python -m tools.services crm|erp``; see docs/services.md."""

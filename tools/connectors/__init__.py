"""Sample connectors: CRM accounts and ERP vendors/invoices over shipped tables."""

"""Invoice documents: HTML (Jinja2) and PDF (xhtml2pdf, pure Python) from a drafted invoice."""

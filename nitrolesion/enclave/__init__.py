"""The enclave side: the application (app) and the service it runs."""

"""The service's core without HTTP: the model set, the request contract, predictions, personalisation, the store."""

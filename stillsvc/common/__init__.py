"""Names, errors and rules shared by the service, its drivers, front-ends and clients."""

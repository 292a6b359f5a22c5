"""The target value that scores nothing: padding, and every MQAR position that is not a query."""

IGNORE_INDEX = -100

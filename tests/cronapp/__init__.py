"""A test app with a cron function, installed only in the worker processes of the cron tests.

Its settings (``tests.cronapp.settings``) add it to the test settings, so that the
every-second function ticks only in the processes that a cron test starts.
"""

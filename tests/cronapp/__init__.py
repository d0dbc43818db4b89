"""A test app with a cron function, installed only in the worker processes of the cron tests.

Its settings (``tests.cronapp.settings``) add it to the test settings, so that the
every-second function ticks only in the processes that a cron test starts. The tests
take the names below from here: importing ``events`` would register the function in
the test process too, where the in-process workers of other tests would tick it.
"""

#: The every-second function's id, and the name it writes in its ``Call`` rows.
EVERY_SECOND, EVERY_SECOND_CALL = "tests.cron_every_second", "cron_every_second"
#: The environment variable naming the file of the tick that blocks (see ``events``).
BLOCK_ENV = "DJANGO_EVENTS_TEST_CRON_BLOCK"

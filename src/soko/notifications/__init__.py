"""Notifications: SMS and email leaving Soko through the outbox.

Other domains call :func:`soko.notifications.public.send_sms` and
:func:`~soko.notifications.public.send_email` inside their own transaction; the message
is delivered by a job once that transaction commits (:mod:`.handlers`), through the
configured channel (:mod:`.channels`).
"""

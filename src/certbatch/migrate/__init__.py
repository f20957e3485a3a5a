"""Taking over another ACME client's accounts, certificates and settings (`certbatch import`).

certbot.py reads a certbot folder (read only), mapping.py turns one certbot lineage into a
certbatch certificate entry, plan.py decides per lineage what is imported and why not,
yamltext.py adds the entries to the config file as text (configfile.py reads the file and
loads the result), apply.py writes the state and the config, report.py makes the lines printed.
Nothing here prints or imports click: the command renders the plan.
"""

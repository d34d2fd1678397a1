"""Studies: study files, job planning and running, cluster waves."""

// chimap, participant level, for one participant (and optionally one session) of a BIDS
// dataset. nf-core module conventions: meta map, task.ext.args, versions.yml, stub.
process CHIMAP {
    tag "${meta.id}"
    label 'process_medium'

    // The image is not published yet: build it from containers/ (see the README) and
    // override with `process.container` in your config.
    container "${ workflow.containerEngine in ['singularity', 'apptainer'] ? 'chimap_0.1.0.sif' : 'chimap/chimap:0.1.0' }"

    input:
    // meta.id: participant label without "sub-"; meta.session: optional session label.
    tuple val(meta), path(bids_dir, stageAs: 'bids')
    // A chimap YAML configuration, or [] for the defaults.
    path config

    output:
    tuple val(meta), path("chimap/sub-*"), emit: maps
    tuple val(meta), path("chimap/dataset_description.json"), emit: description
    path "versions.yml", emit: versions

    when:
    task.ext.when == null || task.ext.when

    script:
    def args = task.ext.args ?: ''
    def config_arg = config ? "--config ${config}" : ''
    def session_arg = meta.session ? "--session-label ${meta.session}" : ''
    """
    chimap \\
        ${bids_dir} \\
        chimap \\
        participant \\
        --participant-label ${meta.id} \\
        ${session_arg} \\
        --nthreads ${task.cpus} \\
        --log-format json \\
        ${config_arg} \\
        ${args}

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        chimap: \$(chimap --version | sed 's/^chimap //')
    END_VERSIONS
    """

    stub:
    """
    mkdir -p chimap/sub-${meta.id}/anat
    touch chimap/sub-${meta.id}/anat/sub-${meta.id}_desc-tkd_Chimap.nii.gz
    echo '{}' > chimap/dataset_description.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        chimap: \$(chimap --version | sed 's/^chimap //')
    END_VERSIONS
    """
}
